"""Features from a Feast feature store: looked up per batch in front of a model
(config.pbtxt parameters feast_*), captured with each answer, and `convoy skew`, which
compares what was served with what Feast's offline store gives for the same moment.
Feast is an optional extra, imported only where a model declares feast_repo."""

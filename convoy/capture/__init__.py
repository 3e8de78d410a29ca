"""What was served becomes data (DESIGN §12): the capture of answered requests to
Parquet (`--capture-dir`, config.pbtxt `capture_*` parameters). docs/capture.md."""

"""gRPC servicers: decode request -> call the core -> encode reply. No batching logic."""

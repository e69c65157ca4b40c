"""Layer 3: sinks (TensorBoard, JSONL, figures, the HTML report) and host glue (Lightning, Hugging Face)."""

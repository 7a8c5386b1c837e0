"""Export ODConv models to the formats people ship: ONNX, CoreML, ORT, ExecuTorch."""

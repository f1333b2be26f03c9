"""Quantization: a float bundle in, an integer bundle out (`cosmoe-export quantize`)."""

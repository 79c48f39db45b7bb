"""Depth-allocation analysis: where a trained model spends its recursions (`mormm analyze`)."""

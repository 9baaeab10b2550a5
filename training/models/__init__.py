"""The model registry (one entry per model: builder, head, Grad-CAM layer) and the networks."""

"""What a model looks at: Grad-CAM heatmaps and the overlays drawn from them."""

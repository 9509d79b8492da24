"""Models on disk: what differs between model families, a model's or ControlNet's folder checked
without loading it, the weights folder and its downloads, LPIPS and its VGG16 trunk, and the tiny
random models the demo falls back on and the tests run."""

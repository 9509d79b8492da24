"""The command lines: one panorama (`python -m syncdiffusion`), the weights download, the quick
start's demo, and the paper's comparison. The batch runner and the web app are rooms of their
own."""

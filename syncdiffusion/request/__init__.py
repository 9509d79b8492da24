"""A request: every input described once (type, default, bounds, help) with its checks, what a
request costs, the images a request brings in, and the image file it leaves with its parameters."""

"""A local web app: make panoramas in the browser, and look around the 360-degree ones.

`python -m syncdiffusion.app` serves a form drawn from the library's description of the inputs
(`inputs.panorama_inputs`; with a ControlNet picked, its inputs and an uploaded condition
image), one GPU job at a time, on 127.0.0.1 only unless `--host` says
otherwise. It needs nothing beyond the library's own requirements: the server is the standard
library's, and the 360-degree viewer (Pannellum) ships with the app in `static/pannellum/`.
What another web site's page can send is refused, and memory, threads and connections are
bounded (`server`, `jobs`); the README's app section says why it is not uvicorn.
"""

"""The Cog predictors' inputs as `cog build` sees them: written into each predictor from the input
description (`predictors`), read back with tree-sitter as cog reads them, and the OpenAPI schema
cog writes (`schema`). Tooling for developers and tests; not in the image."""

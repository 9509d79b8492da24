"""The Cog predictors' inputs as `cog build` sees them: read with tree-sitter as cog reads them, and
the OpenAPI schema it writes. Tooling for the tests and the Cog server runner; not in the image."""

"""Testing and measurement utilities (tiny models, the oracle, the Cog server harness),
importable by the tests and the scripts alike, as diffusers keeps its testing utilities in its
package."""

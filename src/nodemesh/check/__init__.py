"""``nodemesh check``: named host diagnostics, each ✔ or × with a hint (``docs/check.md``)."""

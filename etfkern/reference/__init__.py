"""Plain-torch references (float64-capable): the test oracle and the last-resort backend.
One module per op family, written straight from the definitions in DESIGN.md."""

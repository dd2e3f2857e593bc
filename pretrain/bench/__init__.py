"""Benchmarks that print JSON lines: `liquid bench scan|step|data|checkpoint|gpu`, one module each, and
`common`, what they share."""

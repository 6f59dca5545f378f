"""Stage 7, what people read: a run's report.md, layer tables and pictures, and spec diffs.
"""

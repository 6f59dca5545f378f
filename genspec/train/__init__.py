"""Stage 5, training: the loop (steps of the phase cycle, epochs) and the events it offers to hooks,
the run folder, checkpoints and resume, step traces, the folder lock, and a finished run read back.
"""

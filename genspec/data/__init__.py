"""Stage 4, the datasets a spec names, split, scaled and put on the device; batches for training
and evaluation (sharded across the ranks of a distributed run).
"""

"""The training layer: the loop (train.py), the single-model engine, checkpoints and resume state, preemption,
phases, torchrun, TensorBoard, a run's plots and evaluation, and what a run writes at its boundaries."""

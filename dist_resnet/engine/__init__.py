"""The trainer's components, each with one job (docs/ARCHITECTURE.md):

- `build`: every component from the config, in one order (the RNG order of a run);
- `step`: one optimizer step (loss scaling, the adversary, the after-step hooks);
- `evaluation`: predict, evaluate, what is due after an epoch, robust evaluation, the collapse check;
- `state`: where the run is, the resume point, checkpoints, what a non-finite loss does;
- `report`: the run folder, TensorBoard, metrics.json, the console, timing;
- `warmup`: compile and autotune on throw-away data before the timed run.
"""

"""Model designs behind one interface (`PairModel`, interface.py); `build.build_model` is the only place
that picks one. This package's own import is empty on purpose: a job's driver reads designs.py and
presets.py without loading torch, diffusers or peft (~10 s on 2 cores)."""

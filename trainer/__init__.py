"""Fine-tune, evaluate, calibrate and export image classifiers into model_store/."""

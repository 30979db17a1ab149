"""The stages of a run over one output folder (`pipeline`), and what they need: data splits
(`data`), the reward model (`reward`), evaluation (`evaluate`), sweeps (`sweep`), the report
and plots (`report`, `plots`), model loading (`models`) and the embedded default (`assets`)."""

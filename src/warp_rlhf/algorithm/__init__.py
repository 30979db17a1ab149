"""The paper's algorithm: weight-space merges (`merge`), one REINFORCE run with its anchor
(`reinforce`), WARP's iterations (`warp`) and the REINFORCE baseline (`baseline`)."""

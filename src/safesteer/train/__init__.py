"""Stage 3: localized on-policy distillation of the steered teacher into the student."""

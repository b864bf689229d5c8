"""safesteer: safety alignment by localized on-policy distillation from an activation-steered teacher."""

__version__ = "0.1.0"

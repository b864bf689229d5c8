"""Stages 1 and 2: the refusal direction (the steered teacher) and the safety tokens S."""

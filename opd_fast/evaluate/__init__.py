"""Sampling through the real pipeline, reward adapters, and result tables (`opd-fast sample`, `opd-fast eval`)."""

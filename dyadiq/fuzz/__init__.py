"""Fuzzing dyadiq: structured mutations of models and inputs, run behind a fork per case."""

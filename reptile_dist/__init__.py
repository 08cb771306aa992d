"""Distributed Reptile meta-learning on Ray."""

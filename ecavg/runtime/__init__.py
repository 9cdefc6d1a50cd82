"""Runtimes that move weights between the server and its edges: embedded (one process), Flower."""

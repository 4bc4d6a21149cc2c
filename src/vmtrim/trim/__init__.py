"""Trim guests through their agent and measure what the host got back."""

"""Prove the discard path end to end on a throwaway VM."""

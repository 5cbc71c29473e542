"""Backends shipped with stockade, one package each; found by name through ``stockade.registry``."""

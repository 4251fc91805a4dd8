"""What comes before the fit: alignment, mesh backgrounds, detection, candidate
selection and PSF widths."""

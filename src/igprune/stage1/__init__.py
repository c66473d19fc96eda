"""Stage 1 of IG-Pruning: find mask candidates (cluster the calibration data, train one L0 mask per cluster)."""

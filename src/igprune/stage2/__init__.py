"""Stage 2 of IG-Pruning: route each input to its cluster and run the model under that cluster's mask."""

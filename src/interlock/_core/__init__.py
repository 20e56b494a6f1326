"""Foundation helpers shared by every layer: ids, clocks, logging. Standard library only."""

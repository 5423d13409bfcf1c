"""pinnsketch.pinn."""

"""pinnsketch.io."""

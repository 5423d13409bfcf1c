"""pinnsketch.data."""

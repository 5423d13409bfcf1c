"""pinnsketch.sketch."""

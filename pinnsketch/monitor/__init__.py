"""pinnsketch.monitor."""

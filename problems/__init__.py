"""The pinnsketch PDE library: one module per problem, each with its reference solution."""

"""Transforms of a loop's step body (an FX graph of one step): hoisting its input-only
work, keeping its products with the weights, finding its diagonal highway path."""

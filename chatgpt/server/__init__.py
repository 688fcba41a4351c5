"""What every face shares: client IP, middlewares, routing, state, images, metrics, logging."""

"""Training the small fixtures (BlES and load-balancing losses, CoSMoEs Eq. 5-7)."""

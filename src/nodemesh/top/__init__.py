"""``nodemesh top``: a live full-screen view of traffic between services."""

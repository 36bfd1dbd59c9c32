"""Graph passes: front ends that find loops (``find_*``) and the rewrites that replace them."""

"""e2r-kd: distil a LiDAR racing policy (teacher) into a camera policy (student) through a memorybank."""
__version__ = "0.1.0"

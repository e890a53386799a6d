"""Finding a direction: prompt sets, difference of means and layer choice, the direction-file format."""
